"""Built-in tasks, found before any configured prefix: ``Router``."""
