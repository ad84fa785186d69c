"""The data path (docs/design.md §3.1): the record schema and every data source, the preflight,
where image paths may lead, and what a record's `answer` means (answer matching, numbers in text)."""
