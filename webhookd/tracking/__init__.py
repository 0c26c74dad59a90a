"""Opens and clicks produced on the operator's own server.

    tokens.py     signed tokens and the key ring (no database needed to verify a link)
    links.py      tracked URLs: the pixel and click links put into mail
    rewrite.py    the MIME rewriter: hrefs and the pixel in text/html parts, nothing else
    classify.py   machine-open and bot heuristics (advisory, never suppressing)
    listener.py   the tracking HTTP listener and the recorder behind it
    milter.py     the Postfix milter (pymilter), around rewrite.py
"""
