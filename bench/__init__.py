"""Speed benchmarks behind ``engine bench`` and the scripts in ``benchmarks/``.

One module per measured thing, each a set of plain functions returning JSON-ready dicts, so a
script can run one section alone:

- ``bench.ingest``: ``ingest_paths`` against the bare encoder's forward pass on the same images;
- ``bench.models``: the bare encoder in the configurations worth trying on a CPU;
- ``bench.decode``: decode + preprocess of a camera-sized JPEG with and without draft mode;
- ``bench.query``: warm search latency, warm embed, warm ``search_library``, and a cold
  ``engine query`` in a fresh process (``bench.cold_query`` is that process);
- ``bench.metadata``: SQLite insert and fetch rates through ``MetadataStore``;
- ``bench.index_types``: build time, recall against exact search, speed and size per FAISS index type;
- ``bench.suite``: ``BenchConfig`` and ``run_bench``, every section in one run;
- ``bench.report``: ``format_bench`` and ``text_table``, the results as text;
- helpers: ``bench.synthetic`` (vectors shaped like image embeddings, exact neighbours, recall),
  ``bench.machine`` (what the figures ran on), ``bench.timing`` (percentiles, CPU time, threads),
  ``bench.samples`` (which photos), ``bench.errors`` (``BenchError``).

Importing this package imports nothing heavy; torch, faiss and timm are loaded by the sections
that need them.
"""
