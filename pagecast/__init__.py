"""pagecast: durable, rate-limited bulk sending of Messenger Page messages."""

__version__ = "0.1.0"
