"""The web dashboard: a static page in the package that uses the API like any other client."""
