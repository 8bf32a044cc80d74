"""Every built-in family file, imported explicitly (each registers its plans or adapter on import).

Adding a family: write its file under families/<kind>/ and add one import line here.
"""
# ruff: noqa: F401
from diffpar.families.controlnets import base as _controlnets_base
from diffpar.families.controlnets import sd3 as _controlnets_sd3
from diffpar.families.controlnets import zimage as _controlnets_zimage
from diffpar.families.pipelines import cfg as _pipelines_cfg
from diffpar.families.text_encoders import base as _text_encoders_base
from diffpar.families.text_encoders import clip as _text_encoders_clip
from diffpar.families.text_encoders import decoders as _text_encoders_decoders
from diffpar.families.text_encoders import t5 as _text_encoders_t5
from diffpar.families.transformers import auraflow as _transformers_auraflow
from diffpar.families.transformers import bria as _transformers_bria
from diffpar.families.transformers import bria_fibo2 as _transformers_bria_fibo2
from diffpar.families.transformers import chroma as _transformers_chroma
from diffpar.families.transformers import chronoedit as _transformers_chronoedit
from diffpar.families.transformers import cogview3plus as _transformers_cogview3plus
from diffpar.families.transformers import cogview4 as _transformers_cogview4
from diffpar.families.transformers import dit as _transformers_dit
from diffpar.families.transformers import flux as _transformers_flux
from diffpar.families.transformers import flux2 as _transformers_flux2
from diffpar.families.transformers import flux3 as _transformers_flux3
from diffpar.families.transformers import helios as _transformers_helios
from diffpar.families.transformers import hunyuan_dit as _transformers_hunyuan_dit
from diffpar.families.transformers import hunyuan_video as _transformers_hunyuan_video
from diffpar.families.transformers import longcat_image as _transformers_longcat_image
from diffpar.families.transformers import ltx as _transformers_ltx
from diffpar.families.transformers import lumina2 as _transformers_lumina2
from diffpar.families.transformers import lumina_next as _transformers_lumina_next
from diffpar.families.transformers import minimax_h3 as _transformers_minimax_h3
from diffpar.families.transformers import ovis_image as _transformers_ovis_image
from diffpar.families.transformers import pixart as _transformers_pixart
from diffpar.families.transformers import qwenimage as _transformers_qwenimage
from diffpar.families.transformers import qwenimage21 as _transformers_qwenimage21
from diffpar.families.transformers import sana as _transformers_sana
from diffpar.families.transformers import sd3 as _transformers_sd3
from diffpar.families.transformers import wan as _transformers_wan
from diffpar.families.transformers import wan_variants as _transformers_wan_variants
from diffpar.families.transformers import zimage as _transformers_zimage
from diffpar.families.vaes import base as _vaes_base
from diffpar.families.vaes import cogvideox as _vaes_cogvideox
from diffpar.families.vaes import cosmos as _vaes_cosmos
from diffpar.families.vaes import dc as _vaes_dc
from diffpar.families.vaes import hunyuan_image as _vaes_hunyuan_image
from diffpar.families.vaes import hunyuan_video as _vaes_hunyuan_video
from diffpar.families.vaes import hunyuan_video15 as _vaes_hunyuan_video15
from diffpar.families.vaes import kl as _vaes_kl
from diffpar.families.vaes import ltx as _vaes_ltx
from diffpar.families.vaes import ltx2 as _vaes_ltx2
from diffpar.families.vaes import mochi as _vaes_mochi
from diffpar.families.vaes import qwenimage21 as _vaes_qwenimage21
from diffpar.families.vaes import temporal_decoder as _vaes_temporal_decoder
from diffpar.families.vaes import wan as _vaes_wan
