set terminal pngcairo size 1640,480 font 'sans,11'
set output 'iops_by_qd.png'
set multiplot layout 1,2 title 'IOPS by queue depth (median of rounds, bars min–max; higher is better)' font 'sans,14'
set logscale x 2
set xtics (1,2,4,8,16,32,64)
set xrange [0.7:48]
set offsets 0,0,graph 0.2,0
set grid
set key outside right top
set xlabel 'queue depth (iodepth)'
set ylabel 'IOPS'
set yrange [0:*]
set format y '%.0s%c'
set title 'randread'
plot 'randread.dat' index 0 using ($1*0.9461):($2/1):($3/1):($4/1) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#ff7f0e' dt 1 title 'lupool-file', \
     'randread.dat' index 1 using ($1*1.0000):($2/1):($3/1):($4/1) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#ffbb78' dt 2 title 'base-lupool-file', \
     'randread.dat' index 2 using ($1*1.0570):($2/1):($3/1):($4/1) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#2ca02c' dt 2 title 'nbdkit-file'
set title 'randwrite'
plot 'randwrite.dat' index 0 using ($1*0.9461):($2/1):($3/1):($4/1) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#ff7f0e' dt 1 title 'lupool-file', \
     'randwrite.dat' index 1 using ($1*1.0000):($2/1):($3/1):($4/1) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#ffbb78' dt 2 title 'base-lupool-file', \
     'randwrite.dat' index 2 using ($1*1.0570):($2/1):($3/1):($4/1) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#2ca02c' dt 2 title 'nbdkit-file'
unset multiplot
