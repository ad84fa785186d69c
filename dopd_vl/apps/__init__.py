"""Library apps (docs/design.md §3): whole jobs a user runs from Python or through the `dopd`
command: the offline demo, exporting a run's student with its model card, a run's plots and the
routing page. Each imports the layers below; only the command layer imports them."""
