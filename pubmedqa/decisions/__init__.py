"""How a yes/no/maybe decision is read from a model: option scoring, the decision probe, the calibration, and the
policy that combines them for every engine."""
