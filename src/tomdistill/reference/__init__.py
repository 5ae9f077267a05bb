"""Reference data shipped with tomdistill (published results, loadable as sample datasets)."""
