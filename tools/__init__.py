"""Command-line checks of the deployment paths that are neither the app, training nor benchmarks: the GPU check."""
