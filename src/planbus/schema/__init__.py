"""Database setup's history: the helpers the alembic revisions share.

Frozen: a revision written today must do the same thing next year, so these modules import
nothing from the rest of planbus, and a change of behaviour is a new helper, not an edit.
"""
