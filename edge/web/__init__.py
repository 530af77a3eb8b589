"""The web page: live view, specimen entry, review and sign-off, over the daemon's state or a folder of reports."""
