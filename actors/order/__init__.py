"""Order service: OrderActor per order id, the checkout saga (stock, payment) and the buyers' order API."""
