"""Studies apart from the product (experiments, speed bench, EDA, FLOP counts); the product
never imports them."""
