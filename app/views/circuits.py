import streamlit as st

st.title("Circuits")
st.info("Circuit discovery (attribution graphs across SAE/transcoder latents) gets its page in issue #9.")
