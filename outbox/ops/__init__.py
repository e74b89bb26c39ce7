"""Running the relay in production: metrics, health, HTTP, logs, retention, checks."""
