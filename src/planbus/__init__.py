"""planbus: turns plan_requests rows into engagement plans, instantly and exactly once."""

__version__ = "0.1.0"
