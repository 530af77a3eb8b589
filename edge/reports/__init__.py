"""Reports: a finished count as frozen values, checked against its schema, written as JSON, CSV and HTML."""
