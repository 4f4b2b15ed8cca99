"""Judge evaluation: run the configured judges over a labelled file and measure them."""
