"""The step benchmark of ``reflexflow bench``: configurations, timing, report, command."""
