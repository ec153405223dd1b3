"""How a library's index keeps up with its growth (the part of ``engine.library.Library`` that
writers call after committing rows and vectors: ``update_index``).

- **No rewrite per batch.** The stored vectors are the journal: the index file is saved rarely
  (after ``min_interval_s``, and never more often than ``SAVE_COST_FACTOR`` times the last save
  took, so a large index is saved less often) and at the end of the write, unless the write was
  small against a large index (the saved file then lacks under ``LAZY_SAVE_SHARE`` of it: adding a
  thousand photos to a million does not rewrite the million); whatever a saved file lacks, the
  next open reconciles from the stored vectors by id.
- **Moving up a rung.** With the index type left to the engine (``auto``), when the row count
  crosses into another plan of ``engine.index_policy`` the writer, holding the write lock, builds
  the new index from the stored vectors (trained on a random sample, tuned to the recall target),
  while readers keep searching the saved old one; the new file then replaces it atomically and
  readers (``engine query``, the service on its next reload) open it. Plans change at geometric
  steps of the row count, so growing to n rows rebuilds O(n) vectors in all.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from engine.config import AUTO_INDEX
from engine.errors import EngineError, IndexMissingError
from engine.faults import fault_point

if TYPE_CHECKING:
    from db.store import MetadataStore
    from engine.config import IndexConfig
    from engine.index import VectorIndex
    from engine.index_policy import IndexPlan
    from engine.model_switch import ModelInfo

log = logging.getLogger(__name__)

INDEX_OPTIONS_KEY = "index_options"  # meta: {"memory_budget": bytes, "recall": target} set by reindex
SAVE_COST_FACTOR = 20.0  # saving may take at most about 1/20 of a long write's time
DEFAULT_SAVE_INTERVAL_S = 120.0
LAZY_SAVE_FROM = 100_000  # vectors: from this size a small write's end does not rewrite the file ...
LAZY_SAVE_SHARE = 0.01  # ... while the saved file lacks at most this share of it (readers add it)


class IndexGrowth:
    """The methods of ``engine.library.Library`` that keep its index fit for its size. (Library
    provides the attributes and methods named below.)"""

    _index_saved_at: float | None = None  # monotonic time of this object's last index save
    _index_save_seconds: float = 0.0  # how long that save took
    _index_move_failed: int = -1  # the row count at which moving up failed (not retried below twice that)

    if TYPE_CHECKING:
        @property
        def store(self) -> MetadataStore: ...

        def model_info(self) -> ModelInfo | None: ...

        def index_config(self) -> IndexConfig: ...

        def require_writable(self) -> None: ...

        def _read_state(self) -> dict[str, Any]: ...

        def index_holds_current_vectors(self) -> bool: ...

        def index_is_current(self, index: VectorIndex) -> bool: ...

        def open_index(self, *, required: bool = True) -> VectorIndex | None: ...

        def reconcile(self, index: VectorIndex) -> tuple[int, int]: ...

        def build_index(self, factory: str, *, pending: bool = False, sample: int | None = None, seed: int = 0,
                        tune: bool = True, config: IndexConfig | None = None) -> VectorIndex: ...

        def save_index(self, index: VectorIndex, *, generation: int | None = None,
                       epoch: int | None = None) -> None: ...

    def plan_index(self, rows: int | None = None, dim: int | None = None, *,
                   config: IndexConfig | None = None) -> IndexPlan:
        """The index this library should have for ``rows`` vectors (default: those stored) of
        ``dim`` dimensions (default: its encoder's): the policy's choice within its memory budget
        when its type is ``auto``, else the type chosen by hand. config: the index settings to
        plan with (default: the library's)."""
        from engine.index_policy import IndexPlan, choose_index

        config = config or self.index_config()
        if dim is None:
            info = self.model_info()
            if info is None:
                raise IndexMissingError("the library has no encoder yet, so no index can be planned")
            dim = info.dim
        if rows is None:
            rows = self.store.count_embeddings()
        if config.factory != AUTO_INDEX:
            return IndexPlan(config.factory, "", False, "chosen", 0, "chosen with `engine reindex --index-type`")
        return choose_index(rows, dim, config.memory_budget)

    def set_index_options(self, *, factory: str | None = None, memory_budget: int | None = None,
                          recall: float | None = None) -> None:
        """Record the library's index type (``auto`` or a factory string), memory budget (bytes)
        and recall target; those not given keep their value."""
        options = dict(self.store.get_meta(INDEX_OPTIONS_KEY) or {})
        if memory_budget is not None:
            options["memory_budget"] = int(memory_budget)
        if recall is not None:
            if not 0 < recall <= 1:
                raise EngineError(f"a recall target is a share between 0 and 1, not {recall!r}")
            options["recall"] = float(recall)
        if memory_budget is not None or recall is not None:
            self.store.set_meta(INDEX_OPTIONS_KEY, options)
        if factory is not None:
            self.store.set_meta("index_factory", factory)

    def saved_index(self, seconds: float) -> None:
        """Note that the index was just saved, in ``seconds`` (save_index calls it)."""
        self._index_saved_at = time.monotonic()
        self._index_save_seconds = seconds

    def index_save_due(self, min_interval_s: float = DEFAULT_SAVE_INTERVAL_S) -> bool:
        """True when a writer should save the index now: ``min_interval_s`` since this object last
        saved it (the first call starts the clock), and at least ``SAVE_COST_FACTOR`` times as
        long as that save took."""
        now = time.monotonic()
        if self._index_saved_at is None:
            self._index_saved_at = now
            return False
        return now - self._index_saved_at >= max(min_interval_s, SAVE_COST_FACTOR * self._index_save_seconds)

    def update_index(self, index: VectorIndex | None = None, *, synced: bool = False, final: bool = True,
                     min_interval_s: float = DEFAULT_SAVE_INTERVAL_S) -> VectorIndex:
        """Bring the index in line with what a writer (holding the write lock) just committed:
        move it up a rung when the row count crossed into another plan (see the module's
        docstring), else reconcile it; save it when ``final`` or when a save is due. Returns the
        index to keep using: ``index`` itself when one was given (a new rung replaces its content
        in place), else the saved one, read and reconciled.

        synced: the caller already added to ``index`` everything it committed (ingest does, batch
        by batch), so nothing is reconciled (which reads every stored id). Call it with the same
        index object after each batch (``final=False``) and once at the end (``final=True``)."""
        self.require_writable()
        info = self.model_info()
        if info is None:
            raise IndexMissingError("no library here yet: nothing to index")
        moved = self._move_up_if_due(index, info.dim, index.ntotal if index is not None and synced else None)
        if moved is not None:
            return moved
        if index is None:
            index = self.open_index(required=False)
            if index is None:
                raise IndexMissingError("no library here yet: nothing to index")
        elif not synced:
            self.reconcile(index)
        due = self.index_save_due(min_interval_s)
        if (due or final and not self._saved_file_nearly_current(index)) and not self.index_is_current(index):
            self.save_index(index)
        return index

    def _saved_file_nearly_current(self, index: VectorIndex) -> bool:
        """True when ``index`` is large (``LAZY_SAVE_FROM``) and the saved file, of its type, holds
        a count within ``LAZY_SAVE_SHARE`` of it: readers reconcile the difference cheaply."""
        if index.ntotal < LAZY_SAVE_FROM or not self.index_holds_current_vectors():
            return False
        state = self._read_state()
        saved = state.get("ntotal")
        return (state.get("factory") == index.factory and isinstance(saved, int)
                and abs(index.ntotal - saved) <= LAZY_SAVE_SHARE * index.ntotal)

    def _move_up_if_due(self, index: VectorIndex | None, dim: int, rows: int | None = None) -> VectorIndex | None:
        """The index rebuilt on the next rung and saved, when the library's type is ``auto`` and
        its row count (``rows``, default: counted in the database) calls for another plan
        (``engine.index_policy.next_plan``); else None. ``index`` (when given) takes over the new
        one's content. A build that fails is logged and not retried until the library has doubled."""
        from engine.index_policy import next_plan

        config = self.index_config()
        if config.factory != AUTO_INDEX:
            return None
        if rows is None:
            rows = self.store.count_embeddings()
        if 0 <= self._index_move_failed and rows < 2 * self._index_move_failed:
            return None
        if index is not None:
            current, built = index.factory, index.built_rows
        else:
            state = self._read_state()
            known = self.index_holds_current_vectors()
            current = state.get("factory") if known else None
            built = state.get("built_rows", state.get("ntotal", 0)) if known else 0
            built = built if isinstance(built, int) and built >= 0 else 0
        plan = next_plan(current if isinstance(current, str) else "", built, rows, dim, config.memory_budget)
        if plan is None:
            return None
        started = time.monotonic()
        generation, epoch = self.store.generation(), self.store.embeddings_epoch()
        try:
            fresh = self.build_index(plan.factory)
        except EngineError as exc:
            log.warning("the index stays %s: moving to %s failed (%s)", current, plan.factory, exc)
            self._index_move_failed = rows
            return None
        fault_point("index-rung-built")
        self.save_index(fresh, generation=generation, epoch=epoch)
        log.info("index moved from %s to %s for %d vectors in %.1f s: %s", current or "nothing", fresh.factory, rows,
                 time.monotonic() - started, plan.reason)
        if index is None:
            return fresh
        index.replace_with(fresh)
        return index
