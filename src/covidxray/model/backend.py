"""Keras' backend, chosen before Keras is first imported (it reads it once): torch unless
``KERAS_BACKEND`` says otherwise (jax on a GPU). Every module that imports Keras imports this
first; nothing else touches the environment."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
