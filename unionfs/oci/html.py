"""`unionfs inspect --html`: the report as one self-contained page.

Everything is inline (style, script, the data as JSON): the page loads nothing
from anywhere, so it can be opened from a file, mailed, or kept as a CI artifact.
It shows the stack as bars (each layer's bytes, the shadowed part in red, added /
modified / removed), a table of the wasted paths that sorts by any column (click
its header), and a tree of every layer's own entries that opens directory by
directory. The address's fragment can preset the page: ``#sort=path`` (or
``bytes``, ``layers``; ``-path`` descending) and ``#expand`` (every tree open).
"""
from __future__ import annotations

import html
import json

from .inspect import Report, layer_tree

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}
.summary span{margin-right:2em}
.layer{display:flex;align-items:center;margin:.3em 0}
.layer .name{width:28em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;font-family:monospace}
.bar{height:1.2em;background:#4a90d9;position:relative;min-width:2px}
.bar .waste{position:absolute;right:0;top:0;bottom:0;background:#d9534f}
.layer .figs{margin-left:1em;font-size:.9em;color:#555;white-space:nowrap}
table{border-collapse:collapse}th,td{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}
th{cursor:pointer;background:#f4f4f4}th.sorted-asc:after{content:" \\25B2"}th.sorted-desc:after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.tree{font-family:monospace;margin-left:1em}.tree details>div{margin-left:1.4em}
.whiteout{color:#d9534f;text-decoration:line-through}.shadowed{color:#d9534f}
"""

SCRIPT = r"""
const R = JSON.parse(document.getElementById('report-data').textContent);
function fmt(n){const u=['B','KiB','MiB','GiB','TiB'];let i=0;while(n>=1024&&i<u.length-1){n/=1024;i++}
  return (i?n.toFixed(1):n)+' '+u[i]}
function el(tag,attrs,text){const e=document.createElement(tag);
  for(const k in attrs||{})e.setAttribute(k,attrs[k]);if(text!==undefined)e.textContent=text;return e}
const opts={};for(const part of location.hash.slice(1).split('&')){const [k,v]=part.split('=');if(k)opts[k]=v===undefined?true:v}
// the stack as bars, top-most first
const bars=document.getElementById('bars');const max=Math.max(1,...R.layers.map(l=>l.bytes));
R.layers.forEach((l,i)=>{const row=el('div',{class:'layer',id:'layer-'+i,'data-bytes':l.bytes,
  'data-shadowed':l.shadowed_bytes});row.appendChild(el('span',{class:'name',title:l.path},l.path));
  const bar=el('div',{class:'bar'});bar.style.width=(400*l.bytes/max)+'px';
  const w=el('div',{class:'waste'});w.style.width=(l.bytes?100*l.shadowed_bytes/l.bytes:0)+'%';bar.appendChild(w);
  row.appendChild(bar);row.appendChild(el('span',{class:'figs'},
   `${fmt(l.bytes)} in ${l.files} files; +${l.added} ~${l.modified} -${l.removed}; wasted ${fmt(l.shadowed_bytes)} (${l.shadowed_files} files)`));
  bars.appendChild(row)});
document.getElementById('efficiency').textContent=(100*R.efficiency).toFixed(2)+' %';
document.getElementById('wasted').textContent=fmt(R.wasted_bytes)+' ('+R.wasted_bytes+' bytes)';
document.getElementById('userwasted').textContent=(100*R.user_wasted_percent).toFixed(2)+' %';
// the wasted paths, sortable
const cols=[['path','Path'],['bytes','Wasted bytes'],['layers','Layers']];
let sortKey='bytes',sortDesc=true;
if(opts.sort){sortDesc=opts.sort.startsWith('-');sortKey=opts.sort.replace(/^-/,'')}
function value(r,k){return k==='layers'?r.layers.length:r[k]}
function renderTable(){const t=document.getElementById('wasted-table');t.textContent='';
  const head=el('tr');cols.forEach(([k,label])=>{const th=el('th',{'data-key':k},label);
    if(k===sortKey)th.className=sortDesc?'sorted-desc':'sorted-asc';
    th.onclick=()=>{if(sortKey===k)sortDesc=!sortDesc;else{sortKey=k;sortDesc=k!=='path'}renderTable()};head.appendChild(th)});
  t.appendChild(el('thead')).appendChild(head);const body=t.appendChild(el('tbody'));
  const rows=R.wasted_paths.slice().sort((a,b)=>{const x=value(a,sortKey),y=value(b,sortKey);
    const c=x<y?-1:x>y?1:(a.path<b.path?-1:a.path>b.path?1:0);return sortDesc?-c:c});
  for(const r of rows){const tr=el('tr');tr.appendChild(el('td',{class:'path'},r.path));
    tr.appendChild(el('td',{class:'num','data-bytes':r.bytes},fmt(r.bytes)));
    tr.appendChild(el('td',{class:'num'},String(r.layers.length)));tr.title=r.layers.join('\n');body.appendChild(tr)}}
renderTable();
// a tree per layer, built as directories open
function fill(box,node,prefix,layer){for(const name of Object.keys(node).sort()){const [kind,size,kids]=node[name];
    const path=prefix+'/'+name;
    if(kind==='dir'){const d=el('details',{'data-path':path});d.appendChild(el('summary',{},name+'/'));
      const inner=el('div');d.appendChild(inner);let done=false;
      const open=()=>{if(!done){done=true;fill(inner,kids,path,layer)}};d.addEventListener('toggle',open);
      if(opts.expand){d.open=true;open()}box.appendChild(d)}
    else{const cls=kind==='whiteout'?'whiteout':(R.shadowed[path+'\u0000'+layer]?'shadowed':'');
      box.appendChild(el('div',{class:'entry '+cls,'data-path':path},name+(kind==='file'?'  '+fmt(size):kind==='whiteout'?'  (removed)':'')))}}}
const trees=document.getElementById('trees');
R.trees.forEach((tree,i)=>{const d=el('details',{class:'tree',id:'tree-'+i});
  d.appendChild(el('summary',{},R.layers[i].path));const inner=el('div');d.appendChild(inner);
  fill(inner,tree,'',i);if(opts.expand)d.open=true;trees.appendChild(d)});
document.body.dataset.ready='yes';
"""


def render(report: Report, title: str = "unionfs inspect") -> str:
    shadowed = {}
    for i, lr in enumerate(report.layers):
        for w in report.wasted_paths:
            if lr.path in w["layers"]:
                shadowed[f"{w['path']}\u0000{i}"] = 1
    data = dict(report.to_json(), trees=[layer_tree(lr) for lr in report.layers], shadowed=shadowed)
    # "</" cannot end the script element early; JSON allows the escaped form
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="summary"><span>efficiency: <b id="efficiency"></b></span><span>wasted: <b id="wasted"></b></span>
<span>user wasted: <b id="userwasted"></b></span></div>
<h2>Layers (top-most first)</h2><div id="bars"></div>
<h2>Wasted paths</h2><table id="wasted-table"></table>
<h2>Layer contents</h2><div id="trees"></div>
<script type="application/json" id="report-data">{blob}</script>
<script>{SCRIPT}</script>
</body></html>
"""
