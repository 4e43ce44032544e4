"""Database layer: typed models, engine setup, migrations and the job queue."""
