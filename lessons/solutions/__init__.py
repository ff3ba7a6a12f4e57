"""Reference solutions of the lesson exercises: ``lNN.py`` defines one function per exercise of
lesson NN, named as the exercise (``01.tanh_backward`` -> ``l01.tanh_backward``). The test suite
runs every check against these, so no exercise can rot. Peek only after trying!"""
