"""One module per training stage; each states only what differs from the others (data, loss, reference model)."""
