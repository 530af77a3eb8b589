"""Links: where reports are sent (ASTM or JSON lines over a serial line, files on a USB drive)."""
