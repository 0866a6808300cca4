"""Plugins: the hook specifications, the manager that finds and selects plugins, lft's own ``core``
plugin, and the pytest fixtures for plugin authors."""
