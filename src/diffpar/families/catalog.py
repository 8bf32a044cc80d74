"""Every built-in family file, imported explicitly (each registers its plans or adapter on import).

Adding a family: write its file under families/<kind>/ and add one import line here.
"""
# ruff: noqa: F401
from diffpar.families.controlnets import base as _controlnets_base
from diffpar.families.controlnets import sd3 as _controlnets_sd3
from diffpar.families.controlnets import zimage as _controlnets_zimage
from diffpar.families.text_encoders import base as _text_encoders_base
from diffpar.families.text_encoders import clip as _text_encoders_clip
from diffpar.families.text_encoders import decoders as _text_encoders_decoders
from diffpar.families.text_encoders import t5 as _text_encoders_t5
from diffpar.families.transformers import allegro as _transformers_allegro
from diffpar.families.transformers import auraflow as _transformers_auraflow
from diffpar.families.transformers import cogvideox as _transformers_cogvideox
from diffpar.families.transformers import cogview3plus as _transformers_cogview3plus
from diffpar.families.transformers import cogview4 as _transformers_cogview4
from diffpar.families.transformers import consisid as _transformers_consisid
from diffpar.families.transformers import cosmos as _transformers_cosmos
from diffpar.families.transformers import dit as _transformers_dit
from diffpar.families.transformers import easyanimate as _transformers_easyanimate
from diffpar.families.transformers import flux as _transformers_flux
from diffpar.families.transformers import flux2 as _transformers_flux2
from diffpar.families.transformers import hunyuan_dit as _transformers_hunyuan_dit
from diffpar.families.transformers import hunyuan_video as _transformers_hunyuan_video
from diffpar.families.transformers import hunyuan_video15 as _transformers_hunyuan_video15
from diffpar.families.transformers import hunyuan_video_framepack as _transformers_hunyuan_video_framepack
from diffpar.families.transformers import kandinsky5 as _transformers_kandinsky5
from diffpar.families.transformers import latte as _transformers_latte
from diffpar.families.transformers import lumina2 as _transformers_lumina2
from diffpar.families.transformers import lumina_next as _transformers_lumina_next
from diffpar.families.transformers import mochi as _transformers_mochi
from diffpar.families.transformers import pixart as _transformers_pixart
from diffpar.families.transformers import qwenimage as _transformers_qwenimage
from diffpar.families.transformers import sana as _transformers_sana
from diffpar.families.transformers import sana_video as _transformers_sana_video
from diffpar.families.transformers import sd3 as _transformers_sd3
from diffpar.families.transformers import wan as _transformers_wan
from diffpar.families.transformers import zimage as _transformers_zimage
from diffpar.families.vaes import base as _vaes_base
from diffpar.families.vaes import hunyuan_video as _vaes_hunyuan_video
from diffpar.families.vaes import kl as _vaes_kl
from diffpar.families.vaes import ltx as _vaes_ltx
from diffpar.families.vaes import qwenimage21 as _vaes_qwenimage21
from diffpar.families.vaes import wan as _vaes_wan
