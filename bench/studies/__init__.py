"""One-question studies: benchmarks that answered one question once (which attention core, which
XLA flags, which dtype, where a dense forward spends its time, which padding, a search's step
cost). Each still runs (`python -m bench.studies.NAME`); its result is frozen in
bench/results/frozen/ with the commit it came from, and a rerun is a new result."""
