"""The ``lft`` command line: the parser (``main``) and the commands that are not runs."""
