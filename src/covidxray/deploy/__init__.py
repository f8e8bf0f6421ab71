"""Using a run elsewhere: the web page and REST API (``serve``)."""
