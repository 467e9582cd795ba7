"""The pages jmoshi's servers answer with themselves, in Japanese and English: no token, consent before
recording, a full waiting line, a foreign page. Plain HTML, no script, nothing fetched."""

from __future__ import annotations

import html

CONSENT_PATH = "/jmoshi/consent"

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:40em;margin:3em auto;padding:0 1em;line-height:1.6}"
          "button{font-size:1.2em;padding:.5em 1.5em}blockquote{border-left:4px solid #ccc;margin:1em 0;"
          "padding:.2em 1em;white-space:pre-wrap}")


def _page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="ja"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{title}</title><style>{_STYLE}</style></head>'
            f"<body>{body}</body></html>")


UNAUTHORIZED = _page("J-Moshi: トークンが必要です / a token is needed", """
<h1>トークンが必要です / A token is needed</h1>
<p>この J-Moshi サーバーはトークンを持つ人だけが使えます。サーバーを起動した人に、トークン付きの URL
（<code>?token=…</code> で終わるもの）または QR コードをもらってください。</p>
<p>This J-Moshi server answers only those who hold its token. Ask whoever started it for the URL
that carries it (ending in <code>?token=…</code>) or its QR code.</p>
<p>Programs: <code>Authorization: Bearer TOKEN</code> or <code>?token=TOKEN</code>.</p>
<p>起動した人へ / If you started it: the URL jmoshi printed carries the token; it is also kept in jmoshi's
data folder (<code>~/.local/share/jmoshi/token</code>, or <code>$JMOSHI_HOME/token</code>).</p>
""")

FOREIGN_ORIGIN = _page("J-Moshi: 別のサイトからは使えません / another site", """
<h1>別のサイトからの接続は受け付けません / Not from another site</h1>
<p>J-Moshi との会話は、このサーバー自身のページからだけ始められます。</p>
<p>A conversation with J-Moshi starts only from this server's own page
(the operator may allow others with <code>--allow-origin</code>).</p>
""")

NO_CONSENT = _page("J-Moshi: 同意が必要です / consent first", """
<h1>録音への同意が必要です / Consent is needed first</h1>
<p>このサーバーは会話を録音します。先に<a href="/">最初のページ</a>で同意してください。</p>
<p>This server records conversations: agree on <a href="/">its first page</a> first.</p>
""")

BUSY = _page("J-Moshi: 混み合っています / busy", """
<h1>混み合っています / Busy</h1>
<p>J-Moshi はいま会話中で、順番待ちもいっぱいです。しばらくしてからもう一度お試しください。</p>
<p>J-Moshi is in a conversation and the waiting line is full. Please try again in a minute.</p>
""")


DISK_FULL = _page("J-Moshi: 録音できません / cannot record", """
<h1>いまは録音できません / Recording is not possible now</h1>
<p>録音用のディスクの空きが足りないため、会話を始められません。運用している人に知らせてください。</p>
<p>The disk that keeps the recordings is nearly full, so no conversation can start. Please tell whoever runs
this server.</p>
""")


def consent(operator_text: str, max_minutes: float | None) -> str:
    """The first page a participant sees when the server records: what is kept, then "I agree"."""
    own = f"<blockquote>{html.escape(operator_text.strip())}</blockquote>" if operator_text.strip() else ""
    length = (f"<li>会話は最長 {max_minutes:g} 分です。/ A conversation lasts at most {max_minutes:g} minutes.</li>"
              if max_minutes else "")
    return _page("J-Moshi: 録音への同意 / consent to recording", f"""
<h1>この会話は録音されます / This conversation will be recorded</h1>
{own}
<ul>
<li>あなたの声と J-Moshi の声（音声ファイル）、J-Moshi が話したテキスト、会話の開始・終了時刻、
同意した時刻が、このサーバーを運用する人のコンピューターに保存されます。</li>
<li>Your voice and J-Moshi's (audio files), the text J-Moshi said, when the conversation started and ended,
and when you agreed are kept on the computer of whoever runs this server.</li>
{length}
<li>いつでもページを閉じて会話を終えられます。/ You can end the conversation at any time by closing the page.</li>
</ul>
<form method="post" action="{CONSENT_PATH}">
<button type="submit" id="agree">同意する / I agree</button>
</form>
<p>同意しない場合は、このページを閉じてください。/ If you do not agree, close this page.</p>
""")
