"""Analysis of trained models and datasets: metrics beyond AUC, subgroups, reports, heatmaps,
localisation, robustness, exploration and cross-evaluation. Built on the core (chexnet/*.py);
the core never imports this package."""
