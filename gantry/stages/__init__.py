"""One home per stage: its contract, pure decisions and run(), with no Prefect import."""
