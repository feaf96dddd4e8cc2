"""The command layer: pop-export, pop-generate, pop-bench, pop-eval, pop-analyze.

Argument parsing, one-line errors and Ctrl-C, nothing else: each command builds
its options and calls the tool below it (pop.exporter, pop.runtime, pop.bench,
pop.quality).  Nothing below imports from here.
"""
