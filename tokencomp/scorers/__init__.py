"""Built-in scorer plugins, one method per module."""
