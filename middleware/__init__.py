"""Built-in middleware, one file per YAML ``type``. See middleware/headers.py for the pattern."""
