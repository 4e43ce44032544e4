"""The daemon's HTTP side: probes, JSON API, console pages and templates, auth."""
