"""The outbox tables and everything that reads or writes them.

The relay sees the store through the :class:`~outbox.store.protocol.Store`
protocol, which :class:`~outbox.store.sqlstore.SqlStore` implements; driver
errors become the outbox's own in :mod:`outbox.store.driver_errors`.
"""

from outbox.store.protocol import Store
from outbox.store.rows import EventRow, Lease
from outbox.store.sqlstore import SqlStore

__all__ = ["EventRow", "Lease", "SqlStore", "Store"]
