"""What a run leaves behind: files written atomically (``files``), the summary (``summary``) and the
report (``report``)."""
