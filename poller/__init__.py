"""unleash-poller: Unleash event log → ordered, retried webhook deliveries."""

__version__ = "0.1.0"
