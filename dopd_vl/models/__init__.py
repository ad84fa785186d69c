"""Models (docs/design.md §3.3, §4.6): loading through the Auto classes, model folders, tiny models
for tests and the demo, and FSDP2 sharding with the collectives the layers above use."""
