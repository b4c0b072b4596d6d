"""qaserve under load, cancellation, deadlines, bad input and faults: `make reliability` (full), pytest (CI size)."""
