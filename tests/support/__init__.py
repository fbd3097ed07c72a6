"""Test harness: a real Unleash server on a local PostgreSQL, and a real HTTP receiver."""
