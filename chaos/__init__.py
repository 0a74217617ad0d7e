"""chat-chaos: the live proof that nothing is lost or doubled while things break."""
