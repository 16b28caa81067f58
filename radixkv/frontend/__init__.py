"""The runtime process: the client endpoint and its loop (`server`), the TokenizerManager
(tokenize, validate, detokenize), the scheduler child process, and the launcher that starts it all
(`radixkv.Runtime`, `radixkv launch`). It never imports torch or `radixkv.model`."""
