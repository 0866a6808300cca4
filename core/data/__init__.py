"""Data: reading files (``files``), formatting rows through the hooks (``format``), batches for
Lightning (``loader``), chat templates (``chat``) and the embedded task (``task``)."""
