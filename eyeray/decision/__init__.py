"""From probabilities to answers: calibration, operating points chosen on validation data, the one
`decide` every route uses (labels, referral, confidence, review flag), and ensembles of bundles."""
