"""The one catalogue reader: fashion layout, JSONL and CSV catalogues, field mapping, rejects.

Used by training (``engine.training.job``) and by the indexer (``indexer``), so both apply the
same catalogue-level rules (our choice, issue 3 item 1 and issue 4 step 1):

- a row that cannot be parsed (bad CSV quoting, wrong number of fields, invalid JSON, a
  JSON value that is not an object, invalid UTF-8) is rejected as ``malformed row``;
- a row without a product id is rejected;
- a duplicate product id is rejected, the first occurrence wins;
- a row with neither a usable title nor a usable image is rejected (a local image file
  that does not exist is not usable);
- a row with a title whose local image file is missing is kept, with ``image=None`` and
  the flag ``image_missing`` (the indexer encodes it text-only). Whether an image decodes
  is not checked here (too slow for a reader); callers flag decode errors themselves.

Nothing is dropped silently: every row read ends up either in ``products`` or in
``rejects``, so ``len(products) + len(rejects) == read_count``.

Layouts (``read_catalog`` detects them):

- **fashion**: a folder with ``styles.csv`` (``id,gender,masterCategory,subCategory,
  articleType,baseColour,season,usage,productDisplayName``) and ``images/<id>.jpg``;
  optional ``split.csv`` (``id,split``) read by ``read_split``.
- **JSONL**: one JSON object per line (``.jsonl`` / ``.ndjson``, or a file starting with
  ``{``); blank lines are skipped and not counted.
- **CSV**: a header line, then one product per record (``.csv``; ``.tsv`` is tab-separated).
"""
from engine.catalog.formats import CatalogError, detect_layout
from engine.catalog.reader import (
    FASHION_ATTRIBUTES, FLAG_IMAGE_MISSING, IMAGE_CANDIDATES, ID_CANDIDATES, TITLE_CANDIDATES, CatalogReadResult,
    FieldMapping, Product, Reject, read_catalog, read_split, write_rejects,
)

__all__ = ["CatalogError", "CatalogReadResult", "FASHION_ATTRIBUTES", "FLAG_IMAGE_MISSING", "FieldMapping",
           "ID_CANDIDATES", "IMAGE_CANDIDATES", "Product", "Reject", "TITLE_CANDIDATES", "detect_layout",
           "read_catalog", "read_split", "write_rejects"]
