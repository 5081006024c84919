"""service - the process around the engine: listeners, workers, reload, drain, health."""
