"""The OpenAI-compatible HTTP server (`idlm serve`): protocol, routes, streaming, metrics, playground.

Text lives here: requests are tokenized and outputs detokenized in this package; the engine below
sees token ids only. Nothing here touches tensors or scheduling."""
