"""lft's built-in methods. Each module is one plugin, registered through lft's own entry points
exactly as a third-party package registers its plugins."""
