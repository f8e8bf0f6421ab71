"""The web app (FastAPI) and its page."""
